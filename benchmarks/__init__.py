"""Benchmarks of the plugin against detectron2's and torchvision's RetinaNet (``make bench``)."""
