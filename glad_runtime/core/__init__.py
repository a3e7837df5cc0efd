"""The pure math and data of GLAD (numpy, Pillow, scipy; no engines, no I/O beyond the bundle files)."""
