"""Masks: where synthetic defects go (``targets``) and how generated masks are refined (``refine``)."""
