"""The bottom layer: files written whole, errors a user can act on, locks, output names, the
device and precision, metrics, plots. Imports nothing else of the package."""
