"""Generation-quality metrics (IS / FID / KID / IC-LPIPS / background preservation) with offline backbones.

Entry points: :func:`ops.metrics.quality.quality_partition` and :func:`ops.metrics.quality.summarize`.
"""
