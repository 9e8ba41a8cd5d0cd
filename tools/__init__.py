"""Command-line tools: converters into the COCO layout, the synthetic generator, the dataset viewer.

Library code never imports from here.
"""
