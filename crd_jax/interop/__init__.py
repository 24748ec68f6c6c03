"""Interoperability: the authors' PyTorch checkpoints, ITK / Learn2Reg displacement formats."""
