"""VM-LL on Mindboggle-101: Table V (k = 2, n = 4)."""

from configs._datasets import mindboggle


def get_config():
    c = mindboggle("VM-LL")
    c.model.shift = 2  # n = 4: the 1/4-resolution LL models (Table V)
    return c
