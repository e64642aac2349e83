"""Sessions: the model and its state machine, the store, the port allocator, tickets and the manager."""
