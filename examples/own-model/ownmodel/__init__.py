"""A Flower app in the style of Flower's PyTorch quickstart, with unlearning added by fedunlearn."""
