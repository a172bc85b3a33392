"""python -m snpemu.guest"""

from snpemu.guest import SPEC
from snpemu.runtime.server import run_service

if __name__ == "__main__":
    run_service(SPEC)
