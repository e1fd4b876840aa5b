"""Video data: frame sampling, decoding, clip transforms, dataset parsing, synthetic videos.

Nothing here imports Ray: the Ray programs in `workflows/` call into these functions.
"""
