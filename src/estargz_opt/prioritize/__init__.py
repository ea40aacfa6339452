"""Which files go first, without running anything.

Turns a saved record, a prefetch list or a workload's accessed paths into the prioritized
files of each layer, through the layer index (which names each layer holds). It reads
layer blobs and text files only: no containerd, no runtime, no privileges.
"""
