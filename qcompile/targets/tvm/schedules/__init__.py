"""Schedules: the rule-based CPU schedules of fused kernels (:mod:`.rules`) and MetaSchedule tuning (:mod:`.tune`)."""
