"""Models and calibration data in: loading, normalisation, readers, statistics files."""
