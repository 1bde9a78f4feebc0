"""The joint sampler (JeDi, Sec. 4.3): a set's references held clean while its targets are denoised
(``joint.py``), the two-scale text / image guidance (``guidance.py``), and image I/O (``images.py``)."""
