"""Diffusion toolkit (issue 3): backbone loading, VAE helpers, DDIM sampling/inversion, blending, attention control.

Import submodules directly (``from ops.diffusion.backbone import load_backbone``); this package imports nothing
heavy so that listing methods never loads torch models.
"""
