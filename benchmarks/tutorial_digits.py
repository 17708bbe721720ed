"""A tutorial-style fp32 script (the baseline of benchmark c): scikit-learn digits, the same
stratified 80/20 split as ffdist, 2 conv + 2 fc layers, SGD, batch 32, evaluate after every
epoch, stop at 98% test accuracy. Prints `reached TOP1 at UNIX_TIME epoch N`.

    python benchmarks/tutorial_digits.py
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
digits = load_digits()
X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(digits.target)
tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
train_loader = DataLoader(TensorDataset(X[tr], y[tr]), batch_size=32, shuffle=True)
test_loader = DataLoader(TensorDataset(X[te], y[te]), batch_size=256)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for epoch in range(50):
    model.train()
    for data, target in train_loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            correct += (model(data).argmax(1) == target).sum().item()
    accuracy = correct / len(test_loader.dataset)
    print(f"epoch {epoch}: test accuracy {accuracy:.4f}", flush=True)
    if accuracy >= 0.98:
        print(f"reached {accuracy:.4f} at {time.time():.3f} epoch {epoch}", flush=True)
        break
