#!/usr/bin/env python3
"""Regenerate bench/corpus.txt: 1200 varied robot-domain sentences of 5-60 words (seeded)."""
import random
from pathlib import Path

SUBJECTS = ['the robot', 'the mobile base', 'a forklift', 'the drone', 'the left arm', 'operator',
            'the safety controller', 'the lidar', 'a pedestrian', 'the fleet manager',
            'the camera', 'the gripper', 'the charging dock', 'the planner', 'the vehicle']
VERBS = ['detects', 'approaches', 'avoids', 'reports', 'grasps', 'releases', 'scans', 'follows',
         'maps', 'inspects', 'localises', 'waits for', 'slows down near', 'recharges at',
         'streams data about']
OBJECTS = ['the red pallet', 'an obstacle', 'the loading bay', 'a fallen box', 'the doorway',
           'the conveyor belt', 'a person in a yellow vest', 'aisle seven', 'the shelf',
           'the elevator', 'a wet floor sign', 'the battery pack', 'the inspection point',
           'the parking area', 'an unknown object']
TAILS = ['before the shift ends', 'at low speed', 'with high confidence', 'after a short delay',
         'while the alarm is active', 'during the night patrol', 'in heavy rain',
         'because the path is blocked', 'as requested by the operator', 'near the north gate',
         'and logs the event', 'without human help', 'for the third time today',
         'using the backup sensor', 'according to the new safety policy']
FILLER = ('sensor fusion map update telemetry latency battery torque velocity trajectory '
          'waypoint checkpoint warehouse corridor calibration firmware diagnostics temperature '
          'payload obstacle clearance localisation odometry heading navigation').split()


def sentence(rng: random.Random) -> str:
    target = rng.randint(5, 60)
    words = []
    while len(words) < target:
        clause = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.6:
            clause.append(rng.choice(TAILS))
        if rng.random() < 0.3:
            clause += rng.sample(FILLER, rng.randint(1, 4))
        words += ' '.join(clause).split()
    text = ' '.join(words[:target])
    return text[0].upper() + text[1:] + rng.choice(['.', '.', '.', '!', '?'])


def main() -> None:
    rng = random.Random(20261125)
    lines = [sentence(rng) for _ in range(1200)]
    Path(__file__).with_name('corpus.txt').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
