"""Datasets: folders of images and captions, aspect buckets, the cache stage, the sample dataset."""
