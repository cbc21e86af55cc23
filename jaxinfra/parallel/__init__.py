"""The device mesh, the logical sharding rules, stacked layers and the pipeline schedule, multi-process output; imports settings and core."""
