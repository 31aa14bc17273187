"""Offline benchmark pieces: real labelled images, a fixed domain shift, and a small proxy CLIP.

None of this is needed to serve the plugin; it exists so the method can be measured on a machine
with no network and no GPU.
"""
