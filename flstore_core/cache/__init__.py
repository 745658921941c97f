"""The serverless cache (ARCHITECTURE §3): the shard cache and its eviction policy, the shards a
node holds (rounds with their shared artifacts, job metadata, client histories, global models)
and the cache node that runs workloads where the data is."""
