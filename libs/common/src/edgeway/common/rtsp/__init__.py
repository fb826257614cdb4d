"""RTSP cameras, for every service that reads one (ingestion's captures, the tracker's live
`rtsp` cameras): where a connection may go (`destinations`), the loopback relay FFmpeg
connects through, which refuses redirects (`relay`), frames read by PyAV in a worker thread
(`capture`), and URLs with credentials sealed at rest (`credentials`).

It needs the `rtsp` extra of edgeway-common (PyAV, NumPy, cryptography)."""
