"""Analytics: every interaction recorded, searchable, and never in the way.

record.py turns a finished Interaction into a stored record (privacy.py decides what text may be
kept); recorder.py queues records and writes them in the background to the stores/ chosen in
settings.py; query.py and api.py answer searches; the CLI's analytics commands read the same
stores.
"""
