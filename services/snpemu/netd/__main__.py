"""python -m snpemu.netd"""

from snpemu.netd import SPEC
from snpemu.runtime.server import run_service

if __name__ == "__main__":
    run_service(SPEC)
