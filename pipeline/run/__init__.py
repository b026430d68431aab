"""A run's records and its command line: argv -> Config, the run directory
and what it holds, resuming from it, the summary and the progress line,
reports, plots and sweeps, and a run trained in-process."""
