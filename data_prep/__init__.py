"""Data preparation: synthetic scenes, COCO / VQAv2 readers, WebDataset shards, the resumable loader."""
