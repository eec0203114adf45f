"""Pure metering logic: no faust, no I/O (dedup index, pricing, windows, quota math)."""
