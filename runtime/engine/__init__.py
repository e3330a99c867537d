"""The engine wing: the step layer over one session (IOBinding, KV-cache layouts, `DecodeState`, `SlotBatch`)."""
