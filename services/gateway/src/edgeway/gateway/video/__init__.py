"""Video (WorldSystem's wire): phones in, video consumers and viewers out.

Several phones at once: each names itself with `?device=<id>` (default "phone", the seed's one
phone). Whatever a phone sends that cannot be taken gets an error frame; the socket stays open.
"""
