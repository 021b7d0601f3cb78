"""The table manager starts at once: stock Faust waits 1 s first for tables declared late, and
every table of this app is declared by ``create_app`` (``streamapp.infra.local_state``)."""

from __future__ import annotations

import faust
from faust.tables import TableManager

from streamapp.infra.local_state import StreamappTableManager


async def sleeps_on_start(manager_class: type[TableManager]) -> list[float]:
    """The sleeps the manager's ``on_start`` asks for (its channels and recovery stubbed out)."""
    app = faust.App("table-manager-test", web_enabled=False, TableManager=manager_class)
    manager = app.tables
    asked: list[float] = []
    steps: list[str] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)

    async def update_channels() -> None:
        steps.append("channels")

    class Recovery:
        async def start(self) -> None:
            steps.append("recovery")

    manager.sleep = sleep  # type: ignore[method-assign]
    manager._update_channels = update_channels  # type: ignore[method-assign]
    manager._recovery = Recovery()  # type: ignore[assignment]
    await manager.on_start()
    assert steps == ["channels", "recovery"]
    return asked


async def test_the_table_manager_starts_without_waiting() -> None:
    assert await sleeps_on_start(StreamappTableManager) == []


async def test_fausts_own_table_manager_waits_a_second_which_is_why_ours_differs() -> None:
    """Pins the Faust behaviour the override exists for: should Faust stop waiting, it can go."""
    assert await sleeps_on_start(TableManager) == [1.0]


def test_the_app_uses_it() -> None:
    from streamapp.app import app

    assert type(app.tables) is StreamappTableManager
