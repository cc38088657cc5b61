// Lets the app's identity call agents in an existing Microsoft Foundry resource: the built-in
// "Azure AI User" role (53ca6127-db72-4b80-b1b0-d745d6d5456d; read access to the account and
// project plus the Foundry data actions). Scoped to the project when a project name is given,
// else to the whole Foundry account. Deployed into the resource group that holds the account.

@description('Name of the existing Foundry (AI Services) account.')
param accountName string

@description('Name of the Foundry project under the account; empty to grant on the whole account.')
param projectName string = ''

@description('Principal (object) id of the app\'s user-assigned identity.')
param principalId string

var azureAiUserRoleId = '53ca6127-db72-4b80-b1b0-d745d6d5456d'

resource account 'Microsoft.CognitiveServices/accounts@2025-06-01' existing = {
  name: accountName
}

resource project 'Microsoft.CognitiveServices/accounts/projects@2025-06-01' existing = if (!empty(projectName)) {
  parent: account
  name: projectName
}

resource onProject 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(projectName)) {
  name: guid(account.id, projectName, principalId, azureAiUserRoleId)
  scope: project
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', azureAiUserRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Routines function app: Azure AI User (call agents)'
  }
}

resource onAccount 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (empty(projectName)) {
  name: guid(account.id, principalId, azureAiUserRoleId)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', azureAiUserRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Routines function app: Azure AI User (call agents)'
  }
}

output scope string = empty(projectName) ? account.id : '${account.id}/projects/${projectName}'
