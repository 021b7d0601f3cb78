"""The control domain: project settings, quotas and shed overrides replicated through the control
topic: :mod:`.projects` (a project and its key hashes), :mod:`.records` (the records, built
once for the CLI and the admin API), :mod:`.view` (the state they build), :mod:`.plane` (the
Kafka tail and publisher); and the signed markers (watermark ticks, shed markers) the sink and the
meter write into the events topic (:mod:`.markers`)."""

from streamapp.control.markers import (
    ShedMarker,
    Tick,
    control_headers,
    control_secrets,
    control_signature,
    header_value,
    parse_control,
    verify_control,
)
from streamapp.control.plane import ControlPlane, ensure_control_topic, publish_records, read_view
from streamapp.control.projects import (
    KEY_FIELDS,
    KEY_HASH_PREFIX,
    SECRET_KEY_FIELDS,
    ProjectSettings,
    hash_key,
    new_write_key,
)
from streamapp.control.records import SHED_MODES, key_record, override_record, project_record, quota_record
from streamapp.control.view import ControlView

__all__ = [
    "KEY_FIELDS",
    "KEY_HASH_PREFIX",
    "SECRET_KEY_FIELDS",
    "SHED_MODES",
    "ControlPlane",
    "ControlView",
    "ProjectSettings",
    "ShedMarker",
    "Tick",
    "control_headers",
    "control_secrets",
    "control_signature",
    "ensure_control_topic",
    "hash_key",
    "header_value",
    "key_record",
    "new_write_key",
    "override_record",
    "parse_control",
    "project_record",
    "publish_records",
    "quota_record",
    "read_view",
    "verify_control",
]
