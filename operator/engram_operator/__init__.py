"""engram_operator: the control plane — pure deciders and the drivers that run them."""
