CHECKS: dict = {}


def install(src):
    pass
