"""Data-plane drivers: one small interface (`Driver`, `Tunnel`), one module per mode."""
