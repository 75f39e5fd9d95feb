"""Our own model implementations (Qwen2.5-VL, Qwen2-VL), their loader, registry and image processing.

Entry points: ``workers.models.loader.load_model`` and ``workers.models.processing.ImageProcessor``.
"""
