"""A phone, simulated: what the WorldSystem Android app sends to the gateway.

- `media`: the test pattern (it carries its frame number) as H.264 app packets, JPEG frames and
  IMU messages;
- `wire`: the app's packet format and the gateway's phone endpoints, with senders for tests;
- `simulator`: `Phone`, which streams for ever and reconnects;
- `python -m edgeway.edge.phone`: the command (`__main__`).
"""
