"""SpatialReward (arXiv 2602.07458): a generative, region-grounded reward for image edits."""
