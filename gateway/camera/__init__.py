"""Camera anonymisation on the device: sources, detectors, anonymiser, local frame store."""
