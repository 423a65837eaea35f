"""Research analysis: case studies, representation plots, inference curves and seed reports.

groups.py holds the pure grouping rules; plots.py draws; callbacks.py runs the case studies at
test time; curves.py measures a checkpoint under fewer reverse steps and larger ensembles;
report.py turns finished runs (their results.json files) into tables and paired t-tests.
"""
