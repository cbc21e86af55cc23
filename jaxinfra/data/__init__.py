"""Random-access sources and their global batches (generic), and the byte corpus and its windows; imports parallel, settings and core."""
