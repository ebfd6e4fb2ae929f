"""Reports: metrics as plain data (``metrics``), pictures (``plots``), the self-contained ``report.html``
(``html``), and ``evaluation``: a predictor on a labelled folder -> metrics + report."""
