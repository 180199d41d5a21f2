"""Performance model: FLOPs, parameters, memory, hardware peaks. One implementation shared by the
trainer's MFU counter, `megaloom info` and (later) the planner (DESIGN principle 5)."""
