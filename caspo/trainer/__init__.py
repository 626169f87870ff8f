"""Iterative DPO on Ray Train and the round controller; the data round that feeds them."""
