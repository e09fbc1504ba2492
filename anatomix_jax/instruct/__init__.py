"""Stage-2 instruction data: one record schema, processors of the nine released sources."""
