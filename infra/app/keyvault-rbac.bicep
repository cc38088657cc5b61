// Lets the app's identity read the webhook secrets in an existing Key Vault (RBAC permission model):
// the built-in "Key Vault Secrets User" role (4633458b-17de-408a-b874-0445c86b69e6; read secret
// values, nothing else). App settings that are Key Vault references resolve with this identity
// (the site's keyVaultReferenceIdentity, function.bicep). Deployed into the vault's resource group.

@description('Name of the existing Key Vault holding the webhook secrets.')
param keyVaultName string

@description('Principal (object) id of the app\'s user-assigned identity.')
param principalId string

var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Routines function app: Key Vault Secrets User (webhook secrets)'
  }
}
