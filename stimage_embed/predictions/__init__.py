"""Training and prediction orchestration: arrays out of the store into ``heads``, and
predictions back into the store's ``predictions`` table."""
