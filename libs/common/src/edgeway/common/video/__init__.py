"""Phone video and IMU: the Android H.264 packet format and the per-device IMU orderer."""
