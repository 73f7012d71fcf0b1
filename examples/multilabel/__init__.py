"""Multi-label example for imi_softmax: predict all of a user's held-out items (ML-10M)."""
