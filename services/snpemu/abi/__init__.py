"""Byte layouts shared by more than one service (the guest and the firmware both speak them)."""
