"""`mtp-sweep`: grids of training runs from an experiment file, run locally or emitted for a
cluster through launch/, and collected into results.csv and plots."""
