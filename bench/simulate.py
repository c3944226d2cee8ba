"""Placeholder replaced below."""
def add_parser(sub):
    sub.add_parser("simulate")
def cmd_simulate(args):
    return 0
