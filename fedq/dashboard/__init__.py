"""``fedq dashboard`` and ``fedq report``: a job's views in a browser.

``data.snapshot`` (pure) builds the document every view is drawn from; ``source`` reads a run
folder, ``live`` looks at a live job's queues, ``page`` makes the HTML (CSS, JS and, for a report,
the data inlined: no CDN, nothing from the network) and ``server`` serves it.
"""
