"""The worker's plumbing under the domains: Kafka transport, producers, local state, process memory.

Nothing here knows about projects, meters or S3 layouts. ``transport`` is Faust's aiokafka
transport with bulk delivery and guarded decoding (registered as the ``streamapp://`` broker
scheme); ``producers`` starts aiokafka producers with Faust's connection settings;
``local_state`` rebuilds RocksDB state that is ahead of its changelog; ``process_memory``
caps glibc's malloc arenas before the upload threads start.
"""
