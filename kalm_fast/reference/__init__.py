"""Pure-PyTorch oracles for every op: short, slow, obviously correct. Tests compare every backend to these."""
